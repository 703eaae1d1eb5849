package org.peersync.testserver;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.interceptor.api.IInterceptorBroadcaster;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.config.util.ResourceCountCacheUtil;
import ca.uhn.fhir.jpa.dao.FulltextSearchSvcImpl;
import ca.uhn.fhir.jpa.dao.IFulltextSearchSvc;
import ca.uhn.fhir.jpa.dao.search.HSearchSortHelperImpl;
import ca.uhn.fhir.jpa.dao.search.IHSearchSortHelper;
import ca.uhn.fhir.jpa.delete.ThreadSafeResourceDeleterSvc;
import ca.uhn.fhir.jpa.interceptor.CascadingDeleteInterceptor;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.provider.DaoRegistryResourceSupportedSvc;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.ValueSetOperationProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.search.IStaleSearchDeletingSvc;
import ca.uhn.fhir.jpa.search.StaleSearchDeletingSvcImpl;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.util.ResourceCountCache;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.api.IResourceSupportedSvc;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.LoggingInterceptor;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.rest.server.interceptor.ResponseHighlighterInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import ca.uhn.fhir.validation.IValidatorModule;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import jakarta.persistence.EntityManagerFactory;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.autoconfigure.orm.jpa.JpaProperties;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import java.util.HashMap;
import java.util.List;
import java.util.Map;
import javax.sql.DataSource;

/**
 * The beans HAPI's JPA configuration expects the deployment to provide, plus the RestfulServer.
 * Everything else (DAOs, providers, the JPA validation support chain that includes
 * StructureDefinitions stored on the server, search, expunge, batch2) comes from HAPI.
 */
@Configuration
@Import(ThreadPoolFactoryConfig.class)
public class FhirServerBeans {

	private static final Logger ourLog = LoggerFactory.getLogger(FhirServerBeans.class);

	// ---------------------------------------------------------------- settings

	@Bean
	public JpaStorageSettings jpaStorageSettings(FhirServerSettings theSettings) {
		JpaStorageSettings retVal = new JpaStorageSettings();

		retVal.setResourceClientIdStrategy(theSettings.getClientIdStrategy());
		if (theSettings.getClientIdStrategy() == JpaStorageSettings.ClientIdStrategyEnum.ANY) {
			// numeric client ids would collide with sequential server ids
			retVal.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
		}
		retVal.setAllowMultipleDelete(theSettings.isAllowMultipleDelete());
		retVal.setAllowExternalReferences(theSettings.isAllowExternalReferences());
		retVal.setEnforceReferentialIntegrityOnWrite(theSettings.isEnforceReferentialIntegrityOnWrite());
		retVal.setEnforceReferentialIntegrityOnDelete(theSettings.isEnforceReferentialIntegrityOnDelete());
		retVal.setExpungeEnabled(theSettings.isExpungeEnabled());
		retVal.setDeleteExpungeEnabled(theSettings.isDeleteExpungeEnabled());
		retVal.setSuppressUpdatesWithNoChange(theSettings.isSuppressUpdatesWithNoChange());

		long reuseMillis = theSettings.getReuseCachedSearchResultsMillis();
		retVal.setReuseCachedSearchResultsForMillis(reuseMillis > 0 ? reuseMillis : null);

		// like hapi.fhir.org/baseR4
		retVal.setAllowContainsSearches(true);
		retVal.setCountSearchResultsUpTo(50000);
		retVal.setFetchSizeDefaultMaximum(10000);

		// no Lucene/Elasticsearch
		retVal.setHibernateSearchIndexFullText(false);
		retVal.setHibernateSearchIndexSearchParams(false);

		ourLog.info(
				"Storage settings: clientIdStrategy={} allowMultipleDelete={} allowExternalReferences={} "
						+ "referentialIntegrity(write={}, delete={}) expunge={} deleteExpunge={} "
						+ "reuseCachedSearchResultsForMillis={} suppressUpdatesWithNoChange={}",
				retVal.getResourceClientIdStrategy(),
				retVal.isAllowMultipleDelete(),
				retVal.isAllowExternalReferences(),
				retVal.isEnforceReferentialIntegrityOnWrite(),
				retVal.isEnforceReferentialIntegrityOnDelete(),
				retVal.isExpungeEnabled(),
				retVal.isDeleteExpungeEnabled(),
				retVal.getReuseCachedSearchResultsForMillis(),
				retVal.isSuppressUpdatesWithNoChange());
		return retVal;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/** No subscription channel types are enabled. */
	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	/** The subscription delivery config needs one; e-mail subscriptions are not supported here. */
	@Bean
	public IEmailSender emailSender() {
		return theDetails -> ourLog.warn("E-mail delivery is not supported by the test server; dropped");
	}

	// ---------------------------------------------------------------- persistence

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory theBeanFactory,
			FhirContext theFhirContext,
			JpaStorageSettings theStorageSettings,
			JpaProperties theJpaProperties,
			DataSource theDataSource) {
		LocalContainerEntityManagerFactoryBean retVal =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(theBeanFactory, theFhirContext, theStorageSettings);
		Map<String, Object> props = new HashMap<>(theJpaProperties.getProperties());
		props.putIfAbsent("hibernate.search.enabled", "false");
		props.putIfAbsent("hibernate.hbm2ddl.auto", "update");
		props.putIfAbsent(
				"hibernate.physical_naming_strategy",
				"org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy");
		props.putIfAbsent("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		retVal.setPersistenceUnitName("HAPI_PU");
		retVal.setJpaPropertyMap(props);
		retVal.setDataSource(theDataSource);
		return retVal;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory theEntityManagerFactory) {
		JpaTransactionManager retVal = new JpaTransactionManager();
		retVal.setEntityManagerFactory(theEntityManagerFactory);
		return retVal;
	}

	// ---------------------------------------------------------------- small JPA services
	// (what HapiJpaConfig would add; defined here so that Lucene/ES stay off)

	@Bean
	public IFulltextSearchSvc fullTextSearchSvc() {
		return new FulltextSearchSvcImpl();
	}

	@Bean
	public IStaleSearchDeletingSvc staleSearchDeletingSvc() {
		return new StaleSearchDeletingSvcImpl();
	}

	@Bean
	public IHSearchSortHelper hSearchSortHelper(ISearchParamRegistry theSearchParamRegistry) {
		return new HSearchSortHelperImpl(theSearchParamRegistry);
	}

	@Bean
	public IResourceSupportedSvc resourceSupportedSvc(DaoRegistry theDaoRegistry) {
		return new DaoRegistryResourceSupportedSvc(theDaoRegistry);
	}

	@Bean(name = "myResourceCountsCache")
	public ResourceCountCache resourceCountsCache(IFhirSystemDao<?, ?> theSystemDao) {
		return ResourceCountCacheUtil.newResourceCountCache(theSystemDao);
	}

	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	@Bean
	public DatabaseBackedPagingProvider databaseBackedPagingProvider(FhirServerSettings theSettings) {
		DatabaseBackedPagingProvider retVal = new DatabaseBackedPagingProvider();
		retVal.setDefaultPageSize(theSettings.getDefaultPageSize());
		retVal.setMaximumPageSize(theSettings.getMaxPageSize());
		return retVal;
	}

	// ---------------------------------------------------------------- REST server

	@Bean
	public RestfulServer restfulServer(
			FhirServerSettings theSettings,
			IFhirSystemDao<?, ?> theSystemDao,
			DaoRegistry theDaoRegistry,
			ResourceProviderFactory theResourceProviderFactory,
			IJpaSystemProvider theJpaSystemProvider,
			ValueSetOperationProvider theValueSetOperationProvider,
			JpaStorageSettings theStorageSettings,
			ISearchParamRegistry theSearchParamRegistry,
			IValidationSupport theValidationSupport,
			IValidatorModule theValidatorModule,
			DatabaseBackedPagingProvider thePagingProvider,
			IInterceptorBroadcaster theInterceptorBroadcaster,
			ThreadSafeResourceDeleterSvc theThreadSafeResourceDeleterSvc) {
		FhirContext ctx = theSystemDao.getContext();
		ctx.setNarrativeGenerator(new NullNarrativeGenerator());

		RestfulServer server = new RestfulServer(ctx);
		server.setServerName("peersync test FHIR server (HAPI FHIR JPA)");

		// every resource type: CRUD, search, history, conditional create/update/delete,
		// $validate, $meta, $expunge (type/instance) ...
		server.registerProviders(theResourceProviderFactory.createProviders());
		// system level: transaction/batch at POST /fhir, $expunge, history, ...
		server.registerProvider(theJpaSystemProvider);
		// ValueSet $expand and $validate-code
		server.registerProvider(theValueSetOperationProvider);

		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, theSystemDao, theStorageSettings, theSearchParamRegistry, theValidationSupport));
		server.setPagingProvider(thePagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setDefaultPrettyPrint(true);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());

		// HTML rendering for browsers only
		server.registerInterceptor(new ResponseHighlighterInterceptor());

		if (theSettings.isLogRequests()) {
			LoggingInterceptor logging = new LoggingInterceptor();
			logging.setLoggerName("fhirtest.access");
			logging.setMessageFormat(
					"${requestVerb} ${requestUrl} ${requestParameters} -> ${operationType} ${operationName} ${idOrResourceName} (${processingTimeMillis} ms)");
			logging.setLogExceptions(true);
			logging.setErrorMessageFormat(
					"ERROR ${requestVerb} ${requestUrl} ${requestParameters} -> ${exceptionMessage} (${processingTimeMillis} ms)");
			server.registerInterceptor(logging);
		}

		if (theSettings.isAllowCascadingDeletes()) {
			server.registerInterceptor(new CascadingDeleteInterceptor(
					ctx, theDaoRegistry, theInterceptorBroadcaster, theThreadSafeResourceDeleterSvc));
		}

		FhirServerSettings.Auth auth = theSettings.getAuth();
		if (auth.isEnabled()) {
			if (auth.getIssuer() == null || auth.getIssuer().isBlank()) {
				throw new IllegalStateException("peersync.fhir.auth.jwks-url is set but peersync.fhir.auth.issuer is not");
			}
			server.registerInterceptor(new SmartScopeInterceptor(auth.getJwksUrl(), auth.getIssuer(), auth.getAudience()));
		} else {
			ourLog.info("SMART scope enforcement is off (bearer tokens are ignored)");
		}

		if (theSettings.getValidate().isRequests()) {
			RequestValidatingInterceptor validating = new RequestValidatingInterceptor();
			validating.setFailOnSeverity(ResultSeverityEnum.ERROR);
			validating.setValidatorModules(List.of(theValidatorModule));
			server.registerInterceptor(validating);
			ourLog.info("Request validation is ON (requests with ERROR issues are rejected)");
		} else {
			ourLog.info("Request validation is off");
		}
		return server;
	}
}
